"""Developer tooling that is not a production process: model builder, synthetic frames."""
