#!/usr/bin/env bash
# Create the MONAI Label 0.8.5 virtual environment (.venv-monailabel by default).
#
# MONAI Label is kept out of the main environment: 0.8.5 pins numpy < 2 and imports torchvision,
# which must match torch (the main environment's CPU torch 2.13 has no matching torchvision here),
# so this venv gets torch 2.14.1 + torchvision 0.29.1 (about 8 GB with MONAI Label's dependencies).
# pydicom stays at 2.4.4 (with the pynetdicom and dicomweb-client of that line): MONAI Label imports
# pydicom-seg 0.4.1, which fails to import under pydicom 3.
# The bundle package itself is not installed: MONAI Label puts the bundle root on sys.path while it
# builds the bundle's network and transforms, which is how `ran_bundle` (the atlas transforms and the
# registration pipeline they call) is found, as for any bundle.
# tests/test_monailabel_atlas.py finds this venv's python through RAN_MONAILABEL_PYTHON (default
# .venv-monailabel/bin/python) and skips without it.
#
#   bash scripts/make_monailabel_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-monailabel}"
# built in place (a venv cannot be moved) and removed again if any step fails: the tests never find a
# half-made one
trap 'rm -rf "$venv"; echo "make_monailabel_env: failed, $venv removed" >&2' ERR
python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 monai==1.6.1 monailabel==0.8.5 \
    pydicom==2.4.4 pynetdicom==2.0.2 dicomweb-client==0.59.1 nibabel==5.4.2 SimpleITK==2.5.7 pytorch-ignite==0.5.5
"$venv/bin/python" -c "import monai, monailabel, numpy, torch, torchvision; from monailabel.interfaces.app import MONAILabelApp; from monailabel.tasks.infer.bundle import BundleInferTask; print('MONAI Label', monailabel.__version__, '| MONAI', monai.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| numpy', numpy.__version__)"
# the atlas task's transforms import ran_bundle from the bundle root (ran_bundle.atlas -> the registration
# pipeline): check that its dependencies are all in this venv
"$venv/bin/python" -c "import sys; sys.path.insert(0, '.'); import ran_bundle.atlas; print('ran_bundle.atlas imports')"
trap - ERR
echo "MONAI Label env ready: $venv/bin/python (tests: RAN_MONAILABEL_PYTHON=$venv/bin/python python -m pytest -m monailabel)"
