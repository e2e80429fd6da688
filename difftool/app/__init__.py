"""The application layer: a request resolved once (plan), run (api), over folders (folder_jobs,
batch) and machines (executors). Front ends call it; it calls plugins and core."""
