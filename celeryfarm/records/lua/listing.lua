-- Read what a listing shows of many jobs in one call (read only): one string per job, the
-- values of the fields ARGV names joined by the unit separator (character 31; '' for an
-- absent field), or '' for a job whose record is gone. One string a job keeps the reply
-- small for the client to parse: the cost of a listing is mostly the client's.
-- Run read only (EVALSHA_RO): artists read other artists' records with it.
-- KEYS[1], KEYS[2]... job hashes     ARGV[1], ARGV[2]... field names, 'state' first
-- Returns a list as long as KEYS.
local out = {}
for i = 1, #KEYS do
  local f = redis.call('HMGET', KEYS[i], unpack(ARGV))
  if f[1] then
    for j = 1, #f do
      if not f[j] then f[j] = '' end
    end
    out[i] = table.concat(f, '\31')
  else
    out[i] = ''
  end
end
return out
