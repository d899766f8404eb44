"""umm node: processes, DHT, peer-to-peer transport, disk state and the `umm` CLI.

Importing the package asks hivemind (imported later by its modules) to share tensors through file
descriptors, so that no node starts a `torch_shm_manager` process of its own, and defers hivemind's
package `__init__` (its averager, optimizer and expert server) until a name is read from it
(`node.hivemind_init`).
"""

import os

from node.hivemind_init import defer_hivemind_init

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
defer_hivemind_init()
