"""The embedded demo world: a tiny LLaVA and synthetic Russian data in the real layouts.

Built deterministically from a seed and cached (``core.demo.world.ensure_demo_world``).
"""
