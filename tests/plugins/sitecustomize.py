"""Imported by Python at start-up in the processes the tests start with this folder on
PYTHONPATH (ccpcsa_faults.env_with_plugins): installs the tests' fault injection there."""

import ccpcsa_faults

ccpcsa_faults.install()
