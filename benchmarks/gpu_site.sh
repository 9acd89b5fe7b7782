#!/usr/bin/env bash
# Build a folder with the pure-Python packages the benchmarks need but a bare GPU image may
# lack (monai, torchio, dynamic-network-architectures, hydra-core, omegaconf, antlr4, nibabel,
# deprecated), copied from this machine's Python, plus an import-only SimpleITK stand-in
# (torchio imports SimpleITK, ~250 MB installed, but no benchmark reads image files).
#
#   bash benchmarks/gpu_site.sh [DEST]        # default DEST: logs/.benchdeps/site (git-ignored)
#   BENCH_SITE=$PWD/DEST bash benchmarks/gpu.sh   # on the GPU machine, DEST carried along
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
dest=${1:-logs/.benchdeps/site}
mkdir -p "$dest/SimpleITK"
packages=(monai torchio dynamic_network_architectures hydra omegaconf antlr4 nibabel deprecated)
for pkg in "${packages[@]}"; do
  src=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('$pkg').submodule_search_locations[0])")
  rm -rf "${dest:?}/$pkg"
  cp -r "$src" "$dest/$pkg"
done
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$dest/nibabel/tests"

cat >"$dest/SimpleITK/__init__.py" <<'EOF'
"""Import-only stand-in for SimpleITK on a benchmark machine without it.

TorchIO imports SimpleITK at import time (and uses its classes in type annotations), but the
benchmarks never read or write image files: every attribute is a placeholder class that
raises when it is called.
"""

__version__ = "0.0-stub"


class _MissingType(type):
    """Placeholders are classes, so that ``sitk.Image | None`` annotations work."""

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"SimpleITK stub: {cls.__name__} is not available on this machine")

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing(f"{cls.__name__}.{attr}")


def _missing(name):
    return _MissingType(name, (), {})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
EOF
du -sh "$dest"
