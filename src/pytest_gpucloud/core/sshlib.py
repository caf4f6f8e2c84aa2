"""asyncssh, imported without the deprecation warnings its import triggers.

asyncssh names cryptography's DSA classes at import, and newer cryptography releases warn on each
name (``CryptographyDeprecationWarning``). Under ``-W error`` or ``filterwarnings = error`` in
a user's ini that warning would end their session, so it is ignored here: only that category,
only from asyncssh's own modules, and only while asyncssh imports. Every module of the
package imports asyncssh from here.
"""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)"
    )
    import asyncssh

__all__ = ["asyncssh"]
