"""What passes, backends and measurement share about a graph: op keys, weights and their names, block discovery,
quantization arithmetic. No passes, no sessions."""
