"""The claim checks: pytest + testinfra tests that prove a policy's technical claims on a target.

One module per concern (storage, logging, vpn_confinement, input, lockdown, sandbox, dns, ssh,
firewall, provider, amnesia). Each check is a function decorated with `@check`, which records the
claims it verifies, a one-line rationale and the kinds of target it can run on; its id is
`<module>.<function>`. `amnesiac verify` runs them through pytest with `amnesiac.checks.plugin`,
which turns every outcome (passed, failed, not applicable with a reason) into a result with
the evidence the check gathered.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
# The machinery; every other module of this package holds checks, and its name is the first
# part of their ids.
FRAMEWORK = frozenset({"meta", "plugin", "probe", "results", "expectations"})
MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(DIRECTORY)]) if m.name not in FRAMEWORK))
