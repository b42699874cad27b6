"""The only package that calls torch.distributed; every function takes its process groups explicitly."""
from redi_megatron.parallel.logprobs import vocab_parallel_logprobs

__all__ = ["vocab_parallel_logprobs"]
