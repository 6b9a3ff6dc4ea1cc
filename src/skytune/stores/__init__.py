"""Remote store backends (s3, hf). `skytune.store.open_store` picks one by URL scheme."""
