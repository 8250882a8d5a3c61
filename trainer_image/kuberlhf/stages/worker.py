"""One rank of a stage, as spawned by ``kuberlhf.stages.launch`` (``python -m kuberlhf.stages.worker NAME``)."""

from __future__ import annotations

import argparse
import sys

from kuberlhf.contract.spec import ALL_STAGES
from kuberlhf.stages.errors import report_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kuberlhf-stage-worker")
    parser.add_argument("stage", choices=[st.value for st in ALL_STAGES])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = parser.parse_args(argv)
    from kuberlhf.stages.launch import launch

    with report_errors():
        launch(args.stage, args.pipeline, resume=not args.no_resume, local_rank=args.local_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
