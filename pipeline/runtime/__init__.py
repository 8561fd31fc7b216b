"""Running a job: the one stage runner (Ray and in process), Ray set-up, storage, MLflow tracking,
progress and the pre-flight checks."""
