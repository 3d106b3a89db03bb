"""Developer tools, apart from the training library: the speed benchmark and the GPU launch-path check."""
