#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, x86-64; no network there): what
# gpu_session.sh's steps 4-5 import that its image lacks (gin-config, grain and the two of
# grain's needs it lacks, array-record and portpicker; tensorboardX), the versions this
# project is tested with. Run here, from the repository root, before the device call; then
#   run(command="bash experiments/benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl \
  gin-config==0.5.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
ls -l .whl
du -sh .whl
