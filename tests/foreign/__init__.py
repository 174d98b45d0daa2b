"""Foreign checkpoints' remote code, written for the tests independently of model_impl.

Each module is a complete `trust_remote_code` model file in the layout of another
codebase (its own class, config and tensor names, its own code math), the way the
published checkpoint ships its own code. tests/foreign_checkpoints.py writes them out.
"""
