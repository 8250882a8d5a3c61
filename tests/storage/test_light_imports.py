"""The operator image has no torch: the contract and the storage layer must not import it."""

from __future__ import annotations

import subprocess
import sys


def test_storage_and_contract_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import kuberlhf.contract, kuberlhf.contract.stage, kuberlhf.storage, kuberlhf.storage.seaweed\n"
        "from kuberlhf.storage import ObjectStore\n"
        "ObjectStore.from_uri('s3://b/x', endpoint='http://127.0.0.1:1', env={})._backend(\n"
        "    __import__('kuberlhf.storage.uri', fromlist=['x']).parse_uri('s3://b/x'))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"kuberlhf.storage/contract pulled in heavy modules: {out.stdout.strip()}"
