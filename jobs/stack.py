"""``spae stack up|down|status|env``: the local S3 (SeaweedFS) + MLflow stack on loopback."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from infra.local import stack
from jobs.common import job_parser, parse_job_config, run_main

ACTIONS = ("up", "down", "status", "env")
CONFIG_CLASS = stack.StackConfig
SUMMARY = "start/stop the local stack: SeaweedFS S3 + MLflow server (up|down|status|env)"

EPILOG = """\
examples:
  spae stack up                      # start S3 and MLflow on free loopback ports
  eval "$(spae stack env)"           # export the endpoints and load the credentials file
  spae stack status                  # one line per service: up / down / stopped, checked for real
  spae stack down                    # stop both; no process is left behind
  spae stack up root=/tmp/stack mlflow=false

State lives in $SPAE_STACK_DIR (default ~/.spae/stack): stack.json (endpoints, ports, pids),
credentials.env (generated S3 credentials, mode 0600), one folder per service with its pid and log.
After a crash, `up` restarts what is down on the recorded ports (the endpoints stay the same); if a
port was taken meanwhile, the service gets new ports and MLflow is restarted with the new S3 endpoint.
`status` sends each service a real request (S3: a signed HEAD of the bucket; MLflow: an experiments
search) and exits 1 if a started service does not answer.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae stack {up,down,status,env}", __doc__.splitlines()[0], EPILOG)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ACTIONS:
        action, argv = argv[0], argv[1:]
    elif not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    else:
        parser.error(f"unknown action '{argv[0]}'; choose one of: {', '.join(ACTIONS)}")
    cfg, _ = parse_job_config(stack.StackConfig, parser, argv)
    if action == "up":
        try:
            info = stack.up(cfg)
        except stack.StackError as e:
            print(f"spae stack: {e}", file=sys.stderr)
            return 1
        print(f"stack dir:  {info.root}")
        print(f"S3:         {info.s3_endpoint}  (bucket s3://{info.bucket})")
        if info.mlflow_uri:
            print(f"MLflow:     {info.mlflow_uri}")
        print(f"credentials: {info.credentials_file} (mode 0600)")
        print('use it:     eval "$(spae stack env)"')
        return 0
    if action == "down":
        try:
            stack.down(cfg)
        except stack.StackError as e:
            print(f"spae stack: {e}", file=sys.stderr)
            return 1
        print(f"stack at {cfg.dir} stopped")
        return 0
    if action == "status":
        state = stack.status(cfg)
        print(f"stack dir: {state['root']}  (bucket s3://{state['bucket']})")
        print("\n".join(stack.status_lines(state)))
        return 0 if all(s["state"] == "up" for s in state["services"].values() if s["pid"]) else 1
    # env: shell lines; the secrets are sourced from the 0600 file, never printed
    info = stack.info(cfg)
    for key, value in sorted(stack.env(info, include_secrets=False).items()):
        print(f"export {key}={shlex.quote(value)}")
    if info.credentials_file.exists():
        print(f"set -a; . {shlex.quote(str(info.credentials_file))}; set +a")
    return 0


if __name__ == "__main__":
    run_main(main)
