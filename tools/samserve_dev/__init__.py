"""Support code for the tests and the benchmarks (never shipped): local stacks, seeded images, prompts, the
official generator's reference pieces. Tests import helpers from here, never from other test modules or conftests."""
