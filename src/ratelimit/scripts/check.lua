-- Check every rate-limit policy of one request at once; the request is admitted only when all
-- policies admit it, and a rejected request consumes nothing. Time is this Redis server's clock.
--
-- KEYS[i]  the counter of policy i; all keys share one hash tag (one cluster slot).
-- ARGV[1]  a per-request nonce: the member added to sliding-window logs.
-- ARGV[3i-1], ARGV[3i], ARGV[3i+1]  policy i:
--            "sw",   limit, window_us    exact sliding log (sorted set of admission times)
--            "gcra", burst, interval_us  GCRA (one number: the theoretical arrival time, TAT)
--
-- Returns { now_us, admitted (0|1), then per policy: allowed (0|1), remaining, wait_us }.
-- wait_us: for a policy that rejects, until it admits again; otherwise until one more unit is
-- back (0 when the quota is full).

if redis.replicate_commands then
  pcall(redis.replicate_commands) -- Redis < 5: allow writes after TIME
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nonce = ARGV[1]
local n = #KEYS
local kind, a, b, state = {}, {}, {}, {}
local admit = true

-- Pass 1: read (and drop aged-out log entries: that is garbage collection, not consumption).
for i = 1, n do
  kind[i] = ARGV[3 * i - 1]
  a[i] = tonumber(ARGV[3 * i])
  b[i] = tonumber(ARGV[3 * i + 1])
  if kind[i] == 'sw' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - b[i])
    state[i] = redis.call('ZCARD', KEYS[i])
    if state[i] >= a[i] then
      admit = false
    end
  else
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then
      tat = now
    end
    state[i] = tat
    if tat + b[i] - a[i] * b[i] > now then
      admit = false
    end
  end
end

-- Pass 2: consume (only when every policy admits) and report.
local out = { now, admit and 1 or 0 }
for i = 1, n do
  local key, limit, step = KEYS[i], a[i], b[i]
  local allowed, remaining, wait
  if kind[i] == 'sw' then
    local count = state[i]
    allowed = count < limit
    if admit then
      redis.call('ZADD', key, now, nonce)
      redis.call('PEXPIRE', key, math.ceil(step / 1000))
      count = count + 1
    end
    remaining = math.max(limit - count, 0)
    wait = 0
    if count > 0 then
      -- The entry whose ageing out brings the count back below the limit (the oldest, unless
      -- the limit was lowered while the log was fuller).
      local idx = math.max(count - limit, 0)
      local entry = redis.call('ZRANGE', key, idx, idx, 'WITHSCORES')
      wait = math.max(tonumber(entry[2]) + step - now, 0)
    end
  else
    local tat = state[i]
    allowed = tat + step - limit * step <= now
    if admit then
      tat = tat + step
      redis.call('SET', key, string.format('%d', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
    end
    remaining = math.floor((now + limit * step - tat) / step)
    if remaining < 0 then
      remaining = 0
    end
    if remaining >= limit then
      remaining, wait = limit, 0
    else
      wait = math.max(tat - (limit - remaining - 1) * step - now, 0)
    end
  end
  out[#out + 1] = allowed and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(wait)
end
return out
