#!/usr/bin/env bash
# Wheels that the device machine (python 3.12, x86-64, no network) lacks, into a folder the device
# tool carries (add it to .git/info/exclude). 64 MiB travel per call, so two sets:
#   loader: decord and PyAV (about 48 MB), for bench_loader.py and mp4 data sets;
#   study:  papermill, jupytext, plotly, ipykernel, ipywidgets, anywidget (notebook 03's widgets) and
#           what they need, less what the device image already has (about 28 MB), for
#           `gpu_check.sh study` (its data are clip tensors).
#   bash benchmarks/device_wheels.sh loader .whl     bash benchmarks/device_wheels.sh study .whl-study
set -eu
set_name=${1:?loader or study}; out=${2:?folder}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64)
mkdir -p "$out"
case $set_name in
  loader) python3 -m pip download -q --no-deps "${plat[@]}" -d "$out" decord==0.6.0 av ;;
  study)
    python3 -m pip download -q "${plat[@]}" --platform any -d "$out" papermill jupytext plotly ipykernel ipywidgets anywidget
    # the device image's own packages (KINDS.md): drop their wheels so that one version is installed
    for have in pyyaml requests click tqdm aiohttp markdown_it_py mdurl pygments attrs jinja2 markupsafe packaging \
                psutil narwhals typing_extensions six python_dateutil idna certifi charset_normalizer urllib3 \
                aiosignal frozenlist multidict yarl propcache aiohappyeyeballs; do
      rm -f "$out"/${have}-*.whl "$out"/$(echo $have | tr _ -)-*.whl
    done ;;
  *) echo "unknown set $set_name: loader or study" >&2; exit 2 ;;
esac
du -sh "$out"
