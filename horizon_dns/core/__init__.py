"""The sans-I/O core: messages, wire codec, stage contract, pipeline, handler."""
