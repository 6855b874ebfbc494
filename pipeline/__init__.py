"""segpipe's Ray Data stages: list shards -> read -> decode -> infer -> encode -> write -> commit."""

import time

IMPORT_STARTED_AT = time.time()
"""When this process began importing segpipe's stages (an actor's ``import_started`` figure)."""
