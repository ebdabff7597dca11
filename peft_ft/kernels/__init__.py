"""CPU fast paths: fused LoRA layers, leaner attention dropout, the allocator setting. Optional: a run works without them."""
