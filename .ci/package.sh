#!/usr/bin/env bash
# Package the service as `serverless deploy` would, and prove the result, with
# no AWS account: build the Lambda zip, `serverless package` the
# CloudFormation template around it, cfn-lint the template, then test the
# template and the zip (tests/packaging: every handler is in the zip, IAM is
# least privilege, the unzipped artifact answers API Gateway events with a
# plain interpreter against an embedded PostgreSQL).
#
#   .ci/package.sh            what CI runs (.ci/run calls it)
#   DREAMLENS_PACKAGE_STAGE=prod .ci/package.sh   the template of another stage
#
# Needs uv, node, npm and a CPython of the runtime's version (serverless.yml's
# python3.12) to compile the artifact's bytecode. The Serverless Framework is
# installed from the npm registry into build/serverless/ (ignored by git) at
# the version serverless.yml pins, without a lock file.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE="${DREAMLENS_PACKAGE_STAGE:-ci}"
SLS_DIR=build/serverless
started=$(date +%s)

# the framework asks nothing of the network for `package`: no telemetry, no
# update notices, no dashboard
export SLS_TELEMETRY_DISABLED=1 SLS_NOTIFICATIONS_MODE=off SLS_INTERACTIVE_SETUP_DISABLE=1

# the build strips the wheels' shared objects with binutils' `strip` (47 MB
# unstripped against Lambda's 50 MB limit; the packaging tests refuse an
# unstripped one): gcc brings it, a bare machine may lack both
if ! command -v strip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "--- installing binutils (strip) for the artifact's shared objects"
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo -n"
    { $as_root apt-get update -qq &&
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils >/dev/null; } ||
        echo "binutils could not be installed: the artifact's shared objects stay unstripped" >&2
fi

echo "--- building the Lambda artifact"
# the artifact's bytecode needs a CPython of the runtime's version (the build
# runs `uv python install` for one when the machine has none): an artifact
# without bytecode would compile every module at every cold start, so CI
# refuses to build one
uv run --quiet python .ci/build_lambda.py --require-bytecode

echo "--- serverless package --stage $STAGE"
sls_version=$(sed -n 's/^frameworkVersion: *"\{0,1\}\([0-9.]*\)"\{0,1\} *$/\1/p' serverless.yml)
if [ -z "$sls_version" ]; then
    echo "serverless.yml must pin frameworkVersion" >&2
    exit 1
fi
if [ "$(cat "$SLS_DIR/.installed" 2>/dev/null)" != "$sls_version" ]; then
    rm -rf "$SLS_DIR"
    mkdir -p "$SLS_DIR"
    (cd "$SLS_DIR" && npm install --no-save --no-package-lock --no-audit --no-fund --loglevel=error \
        "serverless@$sls_version" >/dev/null)
    echo "$sls_version" >"$SLS_DIR/.installed"
fi
rm -rf .serverless
package_log=$(mktemp)
# serverless.yml resolves no ${aws:...} variable, so `package` calls no AWS API:
# run it with no credentials at all, and it would fail if it needed any
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true \
    "$SLS_DIR/node_modules/.bin/serverless" package --stage "$STAGE" 2>&1 | tee "$package_log"
# Framework v3.40 validates python3.12 against an old list of runtimes and
# warns (CloudFormation accepts it). Any other configuration problem fails here.
if grep "^  at '" "$package_log" | grep -v "^  at 'provider.runtime'" >&2; then
    echo "serverless.yml has configuration errors (above)" >&2
    exit 1
fi
rm -f "$package_log"

echo "--- cfn-lint"
# W3005: the framework puts a DependsOn on each HTTP API route beside the Ref
# that already implies it; harmless, and generated, not ours to edit
uv run --quiet --group deploy cfn-lint --ignore-checks W3005 -- \
    .serverless/cloudformation-template-update-stack.json \
    .serverless/cloudformation-template-create-stack.json
echo "cfn-lint: no errors, no warnings"

echo "--- template and artifact tests"
uv run --quiet pytest -m packaging tests/packaging

echo "--- packaged in $(($(date +%s) - started)) s"
