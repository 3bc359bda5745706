-- Prepended to every script: Redis's clock and state-list membership.
-- States come from the Python transition table as comma-separated ARGV, never literals.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function is_one_of(csv, value)
  return value ~= nil and value ~= false
    and string.find(',' .. csv .. ',', ',' .. value .. ',', 1, true) ~= nil
end

-- A job's history (its events key): a string of JSON lines, the submission's first, each
-- line's names shortened as EVENT_NAMES says (celeryfarm.records.fields reads them back), so
-- a finished job's history takes a third of the memory of a list of JSON objects; an owner
-- that starts with the job's id (id-attempt.dispatch-step/node/pid) is written without it,
-- as 'p'. A record from before that keeps its list of events, and gets the same lines
-- pushed.
local EVENT_NAMES = {event = 'e', step = 's', dispatch = 'd', attempt = 'a', owner = 'o',
  node = 'n', at = 't', outcome = 'x', lost = 'l', limit = 'm', retry = 'r', why = 'w'}
-- A job whose history is complete (it ended) gets it written again at its exact size:
-- APPEND leaves room to grow, as much again as the string holds.
local function compact_history(key)
  if redis.call('TYPE', key).ok == 'string' then
    redis.call('SET', key, redis.call('GET', key))
  end
end
-- A job's record gets its compact encoding back once its step's lease owner (longer than
-- the values Redis keeps a hash compact for: 64 bytes) has left it: Redis never converts a
-- hash back by itself, and a finished job's record would keep three times the memory.
local function compact_record(key)
  if redis.call('OBJECT', 'ENCODING', key) == 'hashtable' then
    local flat = redis.call('HGETALL', key)
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(flat))
  end
end
local function add_event(key, id, event)
  local short = {}
  for name, value in pairs(event) do short[EVENT_NAMES[name] or name] = value end
  if short.o and string.sub(short.o, 1, #id + 1) == id .. '-' then
    short.p, short.o = string.sub(short.o, #id + 2), nil
  end
  local line = cjson.encode(short)
  if redis.call('TYPE', key).ok == 'list' then
    redis.call('RPUSH', key, line)
  else
    redis.call('APPEND', key, line .. '\n')
  end
end
