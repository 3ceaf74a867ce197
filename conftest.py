"""Repository root on sys.path so tests can import the shared local-pod helpers in e2e/local."""
