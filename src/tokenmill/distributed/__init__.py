"""Beyond one process: Ray Serve replicas behind one OpenAI endpoint, with prefix-affine routing."""
