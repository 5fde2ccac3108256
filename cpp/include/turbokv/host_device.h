// Lets the torch-free headers compile both in host C++ and in CUDA device code.
#pragma once

#if defined(__CUDACC__)
#define TKV_HD __host__ __device__ __forceinline__
#else
#define TKV_HD inline
#endif

// The inline namespace that holds the header functions (not the types) of a translation unit.
// The CPU attention kernel (cpp/cpu/attention_kernel.cpp) is compiled with other code generation
// flags, FMA contraction and a second copy with AVX2, and names its own: the linker keeps one
// copy of an inline function per name, so with one name an AVX2 copy could run on a CPU
// without AVX2, or a contracted copy in the bit-exact encoders.
#ifndef TURBOKV_CODEGEN
#define TURBOKV_CODEGEN exact
#endif
