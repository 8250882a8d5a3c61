"""The operator image has no torch: the contract (with its preflight) and the storage layer must not import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_storage_and_contract_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import kuberlhf.contract, kuberlhf.contract.stage, kuberlhf.storage, kuberlhf.storage.seaweed\n"
        "from kuberlhf.storage import ObjectStore\n"
        "ObjectStore.from_uri('s3://b/x', endpoint='http://127.0.0.1:1', env={})._backend(\n"
        "    __import__('kuberlhf.storage.uri', fromlist=['x']).parse_uri('s3://b/x'))\n"
        "from kuberlhf.contract.preflight import preflight\n"
        "from kuberlhf.contract.spec import parse_pipeline\n"
        "spec = parse_pipeline(open('examples/tiny-cpu.yaml').read()).spec\n"
        "assert preflight(spec) == [] and preflight(spec, local=True) == []\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "", f"kuberlhf.storage/contract pulled in heavy modules: {out.stdout.strip()}"
