"""Where routed expert weights live: the host store, the device cache and the copies between them."""
