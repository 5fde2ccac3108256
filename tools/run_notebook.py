#!/usr/bin/env python3
"""Execute a notebook in place with nbclient (the committed outputs come from this)."""

import sys

import nbclient
import nbformat

path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
nbformat.write(nb, path)
print(f"executed {path}")
