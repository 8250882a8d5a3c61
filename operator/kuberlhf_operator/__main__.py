"""``python -m kuberlhf_operator`` = ``kuberlhf-operator``."""

from kuberlhf_operator.main import main

main()
