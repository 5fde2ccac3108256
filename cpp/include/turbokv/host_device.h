// Lets the torch-free headers compile both in host C++ and in CUDA device code.
#pragma once

#if defined(__CUDACC__)
#define TKV_HD __host__ __device__ __forceinline__
#else
#define TKV_HD inline
#endif
