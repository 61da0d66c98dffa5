"""Offline tools: corpus and notebook generation, head and pattern searches that write configs."""
