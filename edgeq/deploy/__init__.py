"""The robot side of edgeq: load a bundle and act. Imports only numpy and the chosen backend.

.. code-block:: python

    import edgeq.deploy
    policy = edgeq.deploy.load("bundle/", backend="auto")   # trt > cuda > cpu, or named
    action = policy.act(obs)                                # numpy in, numpy out, batch or single
"""

from __future__ import annotations

from edgeq.deploy.policy import BACKENDS, DeployedPolicy, load

__all__ = ["BACKENDS", "DeployedPolicy", "load"]
