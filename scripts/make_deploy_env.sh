#!/usr/bin/env bash
# Create the MONAI Deploy application's own virtual environment (deploy/.venv by default).
#
# The MONAI Deploy App SDK is kept out of the main environment: with it installed, `import monai`
# also needs pydicom and highdicom, and it pulls Holoscan (about 300 MB). This script installs the
# bundle package (editable: deploy/app.py runs the repository's RegistrationPipeline) with its `deploy`
# extra into a separate venv; tests/test_deploy_app.py finds that
# venv's python through RAN_DEPLOY_PYTHON (default deploy/.venv/bin/python) and skips without it.
#
#   bash scripts/make_deploy_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-deploy/.venv}"
# a venv cannot be moved once made, so it is built in place and removed again if any step fails:
# the tests never find a half-made one
trap 'rm -rf "$venv"; echo "make_deploy_env: failed, $venv removed" >&2' ERR
python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.13.0
"$venv/bin/python" -m pip install --quiet -e ".[deploy]"
# the app's pipeline is this package's (installed editable): check that it imports next to the SDK
"$venv/bin/python" -c "import monai, monai.deploy, pydicom, highdicom, ran_bundle.pipeline; print('MONAI', monai.__version__, '+ MONAI Deploy App SDK', monai.deploy.__version__, '+ ran_bundle', ran_bundle.__version__)"
trap - ERR
echo "deploy env ready: $venv/bin/python (a venv elsewhere than deploy/.venv: set RAN_DEPLOY_PYTHON for the tests)"
