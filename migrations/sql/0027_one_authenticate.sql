-- ===========================================================================
-- One function authenticates an API key (revision 0027)
--
-- api.authenticate_v2 (revision 0020) answers the key with its limits, and the
-- API has called it ever since; api.authenticate, kept then for the code that
-- still ran, has no caller left.
-- ===========================================================================

DROP FUNCTION api.authenticate(bytea);
