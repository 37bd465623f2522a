"""Who is calling and what it may do: API keys (the keys file and the per-call check), JWTs, the shared policy
pieces, per-tenant quotas, TLS, and the security settings checked at start-up."""
