"""umm node: processes, DHT, peer-to-peer transport, disk state and the `umm` CLI.

Importing the package asks hivemind (imported later by its modules) to share tensors through file
descriptors, so that no node starts a `torch_shm_manager` process of its own.
"""

import os

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
