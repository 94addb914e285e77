"""Code both services use: gRPC server plumbing, interceptors, tracing, durable files and tar archives."""
