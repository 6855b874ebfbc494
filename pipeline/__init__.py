"""segpipe's Ray Data stages: list shards -> read -> decode -> infer -> encode -> write -> commit."""
