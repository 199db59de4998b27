-- Admission of one request, atomically, in one Redis round trip.
--
-- KEYS[1]  the API key's hash: revocation is checked here, so a key revoked
--          a moment ago is refused on its very next request even when the
--          shim still holds the key's record in its in-process cache
-- KEYS[2]  the customer's GCRA state for requests/min: the theoretical
--          arrival time (TAT) of the next request, in ms
-- ARGV[1]  now, ms (passed in by the shim: no TIME call, tests choose time)
-- ARGV[2]  requests per minute; 0 = unlimited
-- ARGV[3]  the window, ms (60000)
--
-- Returns {status, remaining, retry_after_ms, reset_ms}:
--   status 1 admitted, 0 refused, -1 key revoked or gone.
--
-- GCRA with burst = the per-minute limit: each request adds window/limit to
-- the TAT; a request is admitted while the TAT stays within one window of now.
-- The state is one number per customer and expires when the bucket is full.

if redis.call('HGET', KEYS[1], 'revoked') ~= '0' then
  return {-1, 0, 0, 0}
end

local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
if limit <= 0 then
  return {1, -1, 0, 0}
end

local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[2]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - window

if now < allow_at then
  -- Refused: nothing is written, so refusals do not push admission further out.
  return {0, 0, math.ceil(allow_at - now), math.ceil(tat - now)}
end

redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
return {1, math.floor((now - allow_at) / interval + 1e-9), 0, math.ceil(new_tat - now)}
