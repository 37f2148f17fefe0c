-- Give back what check.lua consumed for one request, when another slot of the same request
-- (Redis Cluster, keys on two hash tags) rejected it: a rejected request consumes nothing.
--
-- KEYS[i]  the counters check.lua admitted the request on (one hash tag).
-- ARGV[1]  the request nonce check.lua used.
-- ARGV[2i], ARGV[2i+1]  policy i: "sw" | "gcra", and for gcra the interval_us it added.

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  if ARGV[2 * i] == 'sw' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  else
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      tat = tat - tonumber(ARGV[2 * i + 1])
      if tat <= now then
        redis.call('DEL', KEYS[i])
      else
        redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
      end
    end
  end
end
return 0
