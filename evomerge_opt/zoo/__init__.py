"""The pico model zoo (tiny real models trained offline) and tiny random model families for tests."""
