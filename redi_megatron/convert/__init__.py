"""HF <-> Megatron checkpoint conversion: redi-hf-to-megatron, redi-megatron-to-hf, redi-verify-parity.

See docs/checkpoints.md; the per-family tables are in ``redi_megatron.convert.mappings``.
"""
