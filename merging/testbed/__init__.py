"""The reasoning test bed: task suite (`tasks`), evaluation harness (`harness`), tiny expert zoo (`zoo`)."""
