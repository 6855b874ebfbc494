"""segpipe's entry points: the CLI, job specs and the jobs that compose the pipeline stages."""
