#!/bin/sh
# A stand-in for actions/runner's `run.sh` (github.com/actions/runner at 2.336.0,
# src/Misc/layoutroot/run.sh) for the emulator's tests; written for this repository, not copied.
# It plays what a just-in-time runner does with one job, against the emulator's GitHub fake:
#   run.sh --jitconfig CONFIG
# - CONFIG is the fake's `encoded_jit_config` (base64 JSON naming the runner);
# - the runner goes online and busy with its job (POST /_emulator/github/runners/{name}; on
#   GitHub the service marks it busy when it assigns the job);
# - ACTIONS_RUNNER_HOOK_JOB_STARTED, the job body, then ACTIONS_RUNNER_HOOK_JOB_COMPLETED, each
#   hook run as the runner runs hooks, `bash -e FILE` (docs/adrs/1751-runner-job-hooks.md of
#   actions/runner); a failing hook fails the job;
# - after its one job an ephemeral runner is removed by GitHub ("automatically unregistered",
#   docs.github.com, "Using ephemeral runners for autoscaling") and the process exits.
# Next to this script: `emulator-url` (the emulator's base URL) and `job.sh` (the job body).
set -u
if [ "$#" -ne 2 ] || [ "$1" != --jitconfig ]; then
    echo "usage: run.sh --jitconfig CONFIG" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
name=$(printf '%s' "$2" | base64 -d | python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])') || {
    echo "run.sh: the --jitconfig value is not a just-in-time configuration" >&2
    exit 2
}
api=$(cat "$here/emulator-url")
runner_state() {
    python3 -c 'import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST")
req.add_header("Content-Type", "application/json")
urllib.request.urlopen(req, timeout=30).read()' "$api/_emulator/github/runners/$name" "$1"
}
echo "fake-runner: $name listening for a job"
runner_state '{"status": "online", "busy": true}' || exit 1
result=succeeded
if [ -n "${ACTIONS_RUNNER_HOOK_JOB_STARTED:-}" ]; then
    bash -e "$ACTIONS_RUNNER_HOOK_JOB_STARTED" || result=failed
fi
if [ "$result" = succeeded ]; then
    echo "fake-runner: running the job"
    sh "$here/job.sh" || result=failed
fi
if [ -n "${ACTIONS_RUNNER_HOOK_JOB_COMPLETED:-}" ]; then
    bash -e "$ACTIONS_RUNNER_HOOK_JOB_COMPLETED" || result=failed
fi
echo "fake-runner: job $result"
runner_state '{"status": "offline", "busy": false, "deleted": true}'
[ "$result" = succeeded ]
